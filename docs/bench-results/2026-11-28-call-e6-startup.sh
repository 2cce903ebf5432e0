# e6 (one H200), 17:14 UTC: the script of call e3 (2026-11-28-call-e3-startup.sh) run again,
# on the tree with the joining driver's preload (issue 14).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
exec bash docs/bench-results/2026-11-28-call-e3-startup.sh
