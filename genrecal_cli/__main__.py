"""`python -m genrecal_cli` behaves exactly like `genrecal`."""

from .cli import main

if __name__ == "__main__":
    main()
