"""What a campaign's calculations cost and what its budget allows: the cost models (``costs``),
the machine probe (``probe``), budget accounting and what-if planning (``planning``), and the
measured error/cost trade-offs of settings (``tradeoff``)."""
