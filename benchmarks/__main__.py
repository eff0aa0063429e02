"""``python -m benchmarks``: run every benchmark, print the table, write the JSON.

Each benchmark starts its own redis-server(s) on free loopback ports (never a shared Redis) and
reports ratios taken within one run: absolute times on shared machines are noisy, ratios of
interleaved measurements much less so. Nothing here asserts a time; ``--quick`` runs every
benchmark at a small size to show it works (the CI smoke test does that).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import Section, markdown, print_table

#: Benchmark modules in the order they run (each has ``run(quick: bool) -> Section``).
BENCHMARKS = {
    "overhead": "benchmarks.overhead",
    "reads": "benchmarks.reads",
    "pages": "benchmarks.pages",
    "writes": "benchmarks.writes",
    "memory": "benchmarks.memory",
    "cleanup": "benchmarks.cleanup",
    "profile": "benchmarks.hotpath",
    "durable": "benchmarks.durable",
}

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def machine() -> dict[str, Any]:
    """What the numbers were taken on."""
    import celery
    import redis

    from benchmarks._redis import redis_version

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    try:
        import hiredis  # noqa: F401

        parser = "hiredis"
    except ImportError:
        parser = "python"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "redis_py": redis.__version__,
        "redis_py_parser": parser,
        "redis_server": redis_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes): shows it works")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results file (default: {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for the README)")
    args = parser.parse_args(argv)

    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.UTC)
    sections: list[Section] = []
    for name in args.only or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        print(f"[{name}] {module.__doc__.splitlines()[0] if module.__doc__ else ''}", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        section: Section = module.run(args.quick)
        section.seconds = time.perf_counter() - begin
        sections.append(section)
        print(f"[{name}] done in {section.seconds:.1f} s", file=sys.stderr, flush=True)

    info = machine()
    title = f"tracker benchmarks, {started:%Y-%m-%d}, {info['cores']} cores, `{command.strip()}`"
    print_table(sections, title)
    if args.markdown:
        print(markdown(sections))
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": command.strip(),
        "quick": args.quick,
        "machine": info,
        "benchmarks": {
            key: {"item": s.name, **s.to_json()} for key, s in zip(args.only or BENCHMARKS, sections, strict=True)
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
