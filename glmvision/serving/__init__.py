"""Serving: the request pipeline every endpoint shares, admission, the response cache."""
