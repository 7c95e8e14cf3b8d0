"""The command's exit codes (see :mod:`orchestrator.cli`): 0 done, and these."""

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_KEPT, EXIT_UNRECORDED = 1, 2, 3, 4
