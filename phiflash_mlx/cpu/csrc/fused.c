/* Fused decode steps: several operations of one layer in one call. */
