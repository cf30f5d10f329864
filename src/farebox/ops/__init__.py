"""Operations over a running server's books: reconciling unfinished payments from the chain."""
