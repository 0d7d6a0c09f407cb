"""Typed stage summaries: what summary.json holds reads back into the same frozen dataclass, and a
stored summary that lacks a field or has an unknown one is an error naming it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tasks.graph import STAGES
from tasks.place import PlacedTier, PlaceSummary
from trecflow.stage import Summary, SummaryError



def test_every_stage_declares_a_frozen_summary_type():
    for stage in STAGES:
        assert stage.summary_type is not None and issubclass(stage.summary_type, Summary), stage.name
        # a summary with several forms (base: path | config | tiny) is a base whose forms are the dataclasses
        forms = [stage.summary_type] if dataclasses.is_dataclass(stage.summary_type) else stage.summary_type.__subclasses__()
        assert forms, stage.name
        for form in forms:
            assert dataclasses.is_dataclass(form) and form.__dataclass_params__.frozen, (stage.name, form)


def test_stored_summaries_round_trip_and_a_missing_key_is_named(trainable):
    store = trainable["store"]  # real outputs of ingest, score, tokenizer, pack, predict, place, base (and its derived train)
    read = 0
    for stage in STAGES:
        for path in store.fs.glob(store.path(stage.name, "*", "summary.json")):
            data = json.loads(store.fs.cat_file(path))
            summary = stage.summary_type.from_json(data)
            assert summary.as_json() == data, stage.name  # same keys, same order, same values
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(summary, dataclasses.fields(summary)[0].name, None)
            read += 1
    assert read >= 5
    place = next(iter(store.fs.glob(store.path("place", "*", "summary.json"))))
    data = json.loads(store.fs.cat_file(place))
    assert isinstance(PlaceSummary.from_json(data).tiers["hq"], PlacedTier)
    with pytest.raises(SummaryError, match="steps"):
        PlaceSummary.from_json({key: value for key, value in data.items() if key != "steps"})
    with pytest.raises(SummaryError, match="surprise"):
        PlaceSummary.from_json({**data, "surprise": 1})
