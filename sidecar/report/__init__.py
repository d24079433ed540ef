"""What the sidecar says about itself at the lowest level: log lines, the redactor that keeps
secrets out of every text it shows, and the observer protocol the proxy reports through.
Everything above may import it; it imports nothing of the sidecar but the config.
"""
