"""The wire between HTTP workers and an engine process: messages, shared-memory tensors, zmq sockets."""
