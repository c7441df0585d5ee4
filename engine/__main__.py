"""``python -m engine …``: the same CLI as ``tandem``, usable as a ``ray job submit`` entrypoint."""

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
