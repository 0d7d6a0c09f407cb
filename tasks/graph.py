"""The pipeline's stages as data: one ordered declaration is the DAG.

`STAGES` lists every stage after the stages it reads. The Prefect form's stage choices, ``--force``,
``--until``, the timing table and the store's folders all come from it. Importing this module
imports no Prefect, Ray, torch or MLflow (each stage imports those inside ``run``).
"""

from __future__ import annotations

from tasks.base_model import BASE
from tasks.evalset import EVALSET
from tasks.ingest import INGEST
from tasks.pack import PACK
from tasks.place import PLACE
from tasks.predict import PREDICT
from tasks.reevaluate import REEVALUATE
from tasks.reference import REFERENCE
from tasks.score import SCORE
from tasks.tokenizer import TOKENIZER
from tasks.train import TRAIN
from trecflow.runner import Graph

# the reference before the CPT run: a reference the recipe cannot train well is refused before either trains
STAGES = (INGEST, SCORE, PREDICT, TOKENIZER, PACK, BASE, REFERENCE, PLACE, TRAIN, EVALSET, REEVALUATE)
GRAPH = Graph(STAGES)
STAGE_NAMES = GRAPH.names
