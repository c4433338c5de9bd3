"""The method-comparison study: every docs/method.md §4 preset trained from one shared base over
several seeds, then a report with the pre-registered verdicts of the claims of docs/method.md §7.
`runner` sets up and runs the runs and estimates their wall time, `claims` holds the statistics
and the verdicts, `report` writes the plots, tables and Markdown, and `python -m
srft_jax.study` (`__main__`) is the command line.
"""
