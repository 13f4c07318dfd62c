"""Runner for every fuzz harness in this package.

A harness is any module `fuzz/<name>.py` that defines `TestOneInput(data:
bytes)`; its seed corpus is `fuzz/corpus/<name>/`. The harness owns its
invariant: it catches the errors its code may legitimately raise, so any
exception that escapes is a finding.

    python -m fuzz.run --smoke                 # CI: replay, then a short fuzz
    python -m fuzz.run --replay                # replay the corpora only
    python -m fuzz.run --minutes 30 [NAME...]  # long run under atheris
    python -m fuzz.run --minutes 30 --grow packet_parser   # keep new inputs

Replay runs in-process without atheris: every corpus file of every harness
goes through every harness (inputs meant for one reader are still arbitrary
bytes for another). Fuzzing runs each harness in its own subprocess under
atheris, bounded by `-max_total_time`, with the seed corpus read-only (new
inputs go to a temporary directory unless `--grow`). Any failing input is
saved under `fuzz/crashes/` and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
_NOT_HARNESSES = {"__init__", "__main__", "run"}
_INSTRUMENTED = ["stack", "outbounds", "tun2sx", "fuzz"]
# CI smoke: the whole fuzz phase (all harnesses, each paying ~1 s of start-up
# on top of its budget) stays under a minute.
SMOKE_BUDGET_S = 40
SMOKE_MAX_PER_HARNESS_S = 10
SMOKE_MIN_PER_HARNESS_S = 3

Harness = Callable[[bytes], None]


def harness_names() -> list[str]:
    """Names of the modules in fuzz/ that define TestOneInput."""
    names = []
    for path in sorted(HERE.glob("*.py")):
        if path.stem in _NOT_HARNESSES:
            continue
        if "def TestOneInput" in path.read_text(encoding="utf-8"):
            names.append(path.stem)
    return names


def load(name: str) -> Harness:
    module = importlib.import_module(f"fuzz.{name}")
    harness: Harness = module.TestOneInput
    return harness


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def save_crash(name: str, data: bytes) -> Path:
    CRASHES.mkdir(exist_ok=True)
    path = CRASHES / f"{name}-replay-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def replay(names: list[str]) -> int:
    """Feed every corpus file to every harness in-process; return failures."""
    files = corpus_files()
    failures = 0
    started = time.monotonic()
    for name in names:
        harness = load(name)
        for path in files:
            data = path.read_bytes()
            try:
                harness(data)
            except Exception:
                failures += 1
                saved = save_crash(name, data)
                print(f"fuzz: {name} failed on {path.relative_to(ROOT)} (saved {saved.name})")
                traceback.print_exc()
    took = time.monotonic() - started
    print(f"fuzz: replayed {len(files)} inputs through {len(names)} harnesses in {took:.1f}s")
    return failures


def fuzz(name: str, seconds: int, grow: bool) -> bool:
    """Run one harness under atheris in a subprocess; True if it held."""
    seeds = CORPUS / name
    seeds.mkdir(parents=True, exist_ok=True)
    CRASHES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as scratch:
        # libFuzzer writes new inputs into the first directory only.
        dirs = [str(seeds)] if grow else [scratch, str(seeds)]
        argv = [
            sys.executable,
            "-m",
            "fuzz.run",
            "--child",
            name,
            f"-max_total_time={seconds}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={CRASHES}/{name}-",
            "-print_final_stats=1",
            *dirs,
        ]
        log = Path(scratch) / "libfuzzer.log"
        with log.open("wb") as sink:
            try:
                done = subprocess.run(
                    argv, cwd=ROOT, timeout=seconds + 120, check=False, stdout=sink, stderr=sink
                )
            except subprocess.TimeoutExpired:
                print(f"fuzz: {name} did not stop in time")
                return False
        lines = log.read_text(errors="replace").splitlines()
    if done.returncode != 0:
        print("\n".join(lines[-80:]))
        print(f"fuzz: {name} failed (exit {done.returncode}); inputs in {CRASHES}")
        return False
    stats = next((line for line in reversed(lines) if line.startswith("Done ")), "no stats")
    print(f"fuzz: {name}: {stats}")
    return True


def child(name: str, libfuzzer_args: list[str]) -> None:
    """Inside the subprocess: instrument the code under test and fuzz."""
    import atheris

    # Only the project's own code gets coverage feedback: instrumenting every
    # loaded module (atheris.instrument_all) costs more startup than the whole
    # smoke budget for one harness.
    with atheris.instrument_imports(include=_INSTRUMENTED):
        harness = load(name)
    atheris.Setup([sys.argv[0], *libfuzzer_args], harness)
    atheris.Fuzz()


def have_atheris() -> bool:
    try:
        importlib.import_module("atheris")
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        child(args[1], args[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--smoke", action="store_true", help="replay, then fuzz briefly (CI)")
    mode.add_argument("--replay", action="store_true", help="replay the corpora only")
    mode.add_argument("--minutes", type=float, help="fuzz each named harness this long")
    parser.add_argument("--grow", action="store_true", help="add new inputs to the seed corpus")
    parser.add_argument("harness", nargs="*", help="harness names (default: all)")
    opts = parser.parse_args(args)
    names = opts.harness or harness_names()
    unknown = sorted(set(names) - set(harness_names()))
    if unknown:
        parser.error(f"no such harness: {', '.join(unknown)}")
    if opts.minutes is None and replay(names):
        return 1
    if opts.replay:
        return 0
    if not have_atheris():
        print("fuzz: atheris is not installed; fuzzing skipped after the replay")
        return 0 if opts.smoke else 1
    if opts.smoke:
        per = SMOKE_BUDGET_S // max(1, len(names))
        seconds = max(SMOKE_MIN_PER_HARNESS_S, min(SMOKE_MAX_PER_HARNESS_S, per))
    else:
        seconds = max(1, round(opts.minutes * 60))
    ok = [fuzz(name, seconds, opts.grow) for name in names]
    if CRASHES.exists() and not any(CRASHES.iterdir()):
        shutil.rmtree(CRASHES)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
