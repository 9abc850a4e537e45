"""The embedded demo: all-MiniLM-L6-v2 fine-tuned on packaged tweet-sentiment and BBC-news data."""

from dare_lab.demo.assets import bbc_news_rows, minilm_dir, tweet_sentiment_rows
from dare_lab.demo.pool import DEMO_TASKS, demo_pool, demo_tasks, prepare_base, prepare_data

__all__ = ["minilm_dir", "tweet_sentiment_rows", "bbc_news_rows", "demo_pool", "demo_tasks", "prepare_base",
           "prepare_data", "DEMO_TASKS"]
