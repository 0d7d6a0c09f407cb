"""The driver of a stage's Ray job: ``python -m trecflow.stage_job STORE_URL SUBMISSION_ID``.

Reads the job's spec from ``STORE_URL/_jobs/SUBMISSION_ID.json`` (written by
`trecflow.ray_jobs.JobLauncher`), then computes the stage exactly as an in-process run does
(`trecflow.runner.Runner.compute`): the lease on the output, owned by this job (so a runner that
finds it lapsed asks the cluster whether the job still runs before taking over), the stage's work
on the cluster this driver joined, the summary, and the manifest last. Progress lines go to the
job's log, which the flow's task follows.
"""

from __future__ import annotations

import sys

from trecflow.lease import JOB, Owner


def main(argv: list[str] | None = None) -> int:
    store_url, submission = (argv if argv is not None else sys.argv[1:])[:2]
    from trecflow.ray_jobs import read_spec
    from trecflow.runner import Runner, default_graph
    from trecflow.settings import store_endpoint
    from trecflow.store import Store

    store = Store(store_url, store_endpoint())
    spec = read_spec(store, submission)
    graph = default_graph()
    stage = graph[spec.stage]
    target = spec.target()

    def report(event) -> None:
        if event.message:
            print(event.message, flush=True)

    runner = Runner(graph, store, forced={stage.name} if spec.force else (), reporters=[report],
                    owner=Owner(JOB, submission))
    result = runner.compute(stage, target, spec.upstream_results(graph), spec.fingerprint, spec.force,
                            {"mlflow_run_id": spec.tracking_run_id} if spec.tracking_run_id else None)
    print(f"{stage.name}: committed {result.uri}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
