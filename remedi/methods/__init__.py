"""Non-learned locators and editors: causal tracing, ROME, MEMIT, knowledge neurons, fine-tuning."""
