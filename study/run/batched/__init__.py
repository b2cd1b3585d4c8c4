"""The batched engine: many trials trained as one computation (stack), its loop (engine),
its in-memory study (mirror) and its storage process (writer, bulk)."""
