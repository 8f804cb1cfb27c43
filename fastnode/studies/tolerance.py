NAME='x'
