"""The process's exit codes, for every command (the README lists them)."""

EXIT_OK = 0
EXIT_CONTACTORS_NOT_CONFIRMED_OPEN = 1
EXIT_USAGE_ERROR = 2
EXIT_SETUP_FAILED = 3
EXIT_LOOP_FAILED = 4
