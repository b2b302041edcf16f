"""Post-processing: generated text becomes an answer: thinking, stop strings, boxes, tool calls, redaction."""
