"""The privacy units a guarantee can be stated in, in words every party prints the same way."""

from __future__ import annotations

UNITS = {
    "example": ("example-level (one training example of one site, add/remove adjacency; not per rating: a rating "
                "is masked out of every later example of its user)"),
    "user": ("user-level (all the data of one user at one site: its training examples, validation and test "
             "items, add/remove adjacency)"),
}
ADJACENCY = {"example": "add/remove one training example of one site",
             "user": "add/remove all the data of one user at one site"}
# The server's optional central DP (server/central_dp.py) protects a different unit.
CLIENT_UNIT = "client-level (all the data of one client, add/remove adjacency)"


def central_unit(partition: str) -> str:
    """The unit of the server's central DP; with one client per user it is a user-level guarantee."""
    if partition == "user":
        return CLIENT_UNIT + "; one client is one user (partition = user), so it is user-level DP"
    return CLIENT_UNIT
