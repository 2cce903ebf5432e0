# e6 (one H200, carry .whl .gpu), 17:14 UTC: the script of call e3 (2026-11-28-call-e3-startup.sh) run again,
# on the tree with the joining driver's preload (issue 14).
exec bash docs/bench-results/2026-11-28-call-e3-startup.sh
