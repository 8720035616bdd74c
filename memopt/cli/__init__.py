"""Command-line tools: ``memopt-bench`` (:mod:`memopt.cli.bench`) compares memory strategies side by side."""
