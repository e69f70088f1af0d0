"""``python -m bench``: every performance figure of kdserve beside its baseline, in one run."""
from bench.run_all import main

raise SystemExit(main())
