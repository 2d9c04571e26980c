"""Coverage-guided fuzzing of corevisor's parsers and register interfaces (atheris).

``fuzz/targets/`` holds one module per target, each with ``one_input(data: bytes)``:
it feeds the bytes to a parser or a device the way a hostile guest, image or GDB
client would, and lets only the errors that parser is allowed to raise (LoaderError,
ConfigError, QueueError, ...) pass; anything else, or a broken invariant, is a crash.
``fuzz/corpus/TARGET/`` is each target's seed corpus, kept small and in the repo;
crashes found become files there too, so the pytest replay (tests/unit/test_fuzz_corpus.py
and tests/kvm/test_gdb_fuzz.py) keeps them fixed. ``python -m fuzz.run`` (``make fuzz``)
runs every target for a budget and reports executions per target.
"""
