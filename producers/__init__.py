"""Mock booking and payment event producers (faker) and their publishers."""
