"""Ring dilated attention: exact LongNet attention on sequences split across processes."""
