"""Fuzz harnesses (atheris) for everything that reads untrusted bytes.

Each `fuzz/<name>.py` defines `TestOneInput(data: bytes)` and has a seed
corpus in `fuzz/corpus/<name>/`; `python -m fuzz.run` replays and fuzzes them.
"""
