import logging
import os
import sys

from orchestrator.cli import main

code = main()
# Python's teardown at exit (its last collections walk a heap that torch and Ray made large)
# takes seconds on a loaded machine, past the 10 s a process manager waits after SIGTERM; the
# command has stopped its Ray and written its files, so only the output is left to flush.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
