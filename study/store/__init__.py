"""Where a study is stored: one interface over SQLite, PostgreSQL and the journal file."""
