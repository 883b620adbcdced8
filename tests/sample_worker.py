"""One process of tests/test_sample.py's two-process dumps: argv = coordinator, process id, the
request json, the report path.

The request lists dumps (DumpArgs fields, sampler fields, max_batches) to run one after another,
and directories to watch. A Python audit hook records every file access under them (open, with its
mode; listing, mkdir, rename, remove, rmtree) from the start of the first dump, so the test can
check that process 1 never touches a dump's output. Each process first writes one file into the
request's `control` directory: the hook must see that write, or it would see nothing at all.
"""
import json
import os
import sys

import jax

jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))

from ddt_jax import sample_dump  # noqa: E402
from ddt_jax import sampler as sampler_lib  # noqa: E402

WATCHED_EVENTS = ("open", "os.", "shutil.", "glob.")   # the audit events that name paths


def watch(roots: list[str], events: list) -> None:
    """Appends [event, path, open mode] for every audited access to a path under `roots`."""
    roots = [os.path.abspath(r) for r in roots]

    def under(path: str) -> bool:
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    def hook(event, args):
        if not event.startswith(WATCHED_EVENTS):
            return
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(arg))
                if under(path):
                    mode = args[1] if event == "open" and isinstance(args[1], str) else ""
                    events.append([event, path, mode])

    sys.addaudithook(hook)


def main(request_path: str, report_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    process = jax.process_index()
    events = []
    watch(request["watch"], events)
    with open(os.path.join(request["control"], f"p{process}.txt"), "w") as f:
        f.write("the hook sees this write")
    results = []
    for step in request["steps"]:
        config = sampler_lib.default_sampler_config()
        config.update(step["sampler"])
        args = sample_dump.DumpArgs(**step["args"])
        try:
            path = sample_dump.run(args, config, max_batches=step.get("max_batches"))
            result = {"path": None if path is None else os.fspath(path)}
        except ValueError as e:   # a refused dump: every process raises at the same point
            result = {"error": type(e).__name__, "message": str(e)}
        if process == 0:   # what the step left in parts/ (process 0 owns the output)
            parts = os.path.join(args.output, "parts")
            result["parts"] = sorted(os.listdir(parts)) if os.path.isdir(parts) else None
        results.append(result)
    report = dict(process=process, devices=jax.device_count(),
                  local_devices=jax.local_device_count(), results=results, events=list(events))
    with open(report_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[3], sys.argv[4])
