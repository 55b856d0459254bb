"""The ReAct policy's prompt and parsing, and the ActRe annotator."""
