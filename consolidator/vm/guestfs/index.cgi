#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "consolidator guest $(cat /www/name)"
echo "name=$(cat /www/name)"
echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
