"""Parent against child: perplexity, multiple choice, lm-eval, translation, generated samples, comparison and gates."""
