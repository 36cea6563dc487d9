"""`python -m registry ...`: see registry/cli.py."""

from registry.cli import main

if __name__ == "__main__":
    main()
