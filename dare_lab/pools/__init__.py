"""Model pools that come with the package, built offline and cached.

tiny          random-init tiny BERT / Llama pools (tests, CI, ``--fast`` reproductions)
encoder_demo  all-MiniLM-L6-v2 fine-tuned on packaged tweet-sentiment and BBC-news data
decoder_demo  SmolLM2-135M-Instruct fine-tuned on reasoning-gym's gsm_symbolic (CPU)
assets        where the packaged weights and data files live

Import the module you need: this package imports none of them (the demos pull in training).
"""
