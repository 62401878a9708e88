"""Training data: what a row says (`formats`), where rows come from (`sources`), one item
tokenized by each side with its turns marked (`render`), and batches for the loop (`loader`)."""
