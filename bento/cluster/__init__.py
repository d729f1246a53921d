"""Cluster mode: several nodes on one Redis, any node serves any token.

The node that starts a session runs it as in the embedded mode (its exchange,
its logs on its own disk) and mirrors it into Redis: the directory (token
hashes → session, node), the session's snapshot, and its output frames in a
Redis Stream. Another node serves that session's readers from Redis. Nothing
here runs unless the server was started with ``--cluster``; the embedded mode
never imports this package.

    keys      the Redis key names (one session's keys share a hash slot)
    node      the node's Redis client, its heartbeat, the directory, idempotency
              keys and stored functions across nodes
    mirror    one session's output log and snapshot copied into Redis
    remote    requests on a node that does not run the session: attachments
              read from Redis, the rest asked of the running node
    directory a session's status from Redis, and ``list`` across the nodes
    control   requests between nodes, through each node's control stream
    lost      a dead node's sessions ended lost
    placement an execute a full node has no room for, run on another live node
"""
