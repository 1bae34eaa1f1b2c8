"""``python -m vugen``: the ``vugen`` command, for a process started from Python (``sys.executable -m vugen``)."""

from vugen.cli import main

if __name__ == "__main__":
    main()
