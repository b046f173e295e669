import sys

try:  # a Ctrl-C this early (the import, before main's own handler) also ends with one line, not a traceback
    from lorakit.cli import main
except KeyboardInterrupt:
    print("lorakit: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
