"""Lazy pulling: fetch the chunks of eStargz layers on demand and keep them on local disk."""
