"""evolver: an experiment loop for fine-tuning image classifiers."""

__version__ = "0.1.0"

# Makes `hydra/sweeper=evolver` discoverable from an editable install (see the plugin package).
import hydra_plugins.evolver_sweeper  # noqa: F401
