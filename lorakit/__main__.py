import os
import sys

try:  # a Ctrl-C this early (the import, before main's own handler) also ends with one line, not a traceback
    from lorakit.cli import main
except KeyboardInterrupt:
    from lorakit._rank import speaks

    if speaks():  # torchrun passes Ctrl-C to every process: say it once, as main does
        print("lorakit: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
