"""remus-receiver: the backup side of Remus (listen, stage, commit, ack,
failover). Imports xenbind only, never remusd."""
