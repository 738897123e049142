"""A "chroma" that never listens: started by stcs through `chromaCommand` as ``portless.py
REPORT run ... --port N``, it writes N to the file REPORT and sleeps.  With it a test can put a
process that is *not* stcs's child on the child's port (a local user squatting it) and see
whether stcs takes that process's answers for its child's."""

import sys
import time

report, args = sys.argv[1], sys.argv[2:]
port = args[args.index("--port") + 1]
with open(report, "w") as fh:
    fh.write(port)
time.sleep(120)
