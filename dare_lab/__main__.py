"""``python -m dare_lab`` is the ``dare-lab`` command."""

from dare_lab.shell.cli import main

if __name__ == "__main__":
    main()
