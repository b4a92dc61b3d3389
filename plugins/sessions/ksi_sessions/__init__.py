"""ksi-sessions: a session's conversation, kept in the host database and sent before each request that continues it."""
