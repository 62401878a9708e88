"""The subcommands' edge over the core (recipe, models, data, engine): each command's modules turn
its arguments into calls of the core and show what comes back. Nothing in engine/ or data/ imports
from here."""
