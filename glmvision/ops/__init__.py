"""Operations: metrics, request logs, the audit log and the response cache."""
