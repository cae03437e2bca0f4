"""Bring your own model: ``torch.export`` programs validated as data, LoRITa and SVT on their graph.

- :mod:`core.program.archive`: the validator (no torch import; the API runs it on upload).
- :mod:`core.program.load`: pickle-free building, first in a child process.
- :mod:`core.program.graph`: the program as a module, LoRITa on its weights, the SVT rewrite
  and the re-exports.
"""

from core.program.archive import ProgramArchive, ProgramError, validate_archive

__all__ = ["ProgramArchive", "ProgramError", "validate_archive"]
