"""Results directory writer, terminal summaries (HTML report and run comparison come later)."""
