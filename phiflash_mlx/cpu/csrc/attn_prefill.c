/* Differential attention of many queries (prompt processing) over key ranges. */
