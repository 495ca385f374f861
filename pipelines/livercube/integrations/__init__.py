"""Store volumes in the data pipelines of other frameworks (MONAI, TorchIO).

Each module imports its framework when imported itself, so ``import livercube`` never needs
them: ``from livercube.integrations.monai import LivercubeReader`` or
``from livercube.integrations.torchio import subject``.
"""
