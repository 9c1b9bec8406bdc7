"""ASA parity: the reference evaluator of the kept ASA query, and the fact-table comparer."""
